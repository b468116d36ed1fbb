"""The classroom: a teacher's view of every project on the server (``overview``) and the class challenge on a
locked test set (``challenge``). Engine only: the Teacher page and the workers call these."""
