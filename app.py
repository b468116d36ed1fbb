"""TL Studio: the Streamlit app (a router; each page lives in pages/)."""

import streamlit as st

st.set_page_config(page_title="TL Studio", page_icon="🧠", layout="wide")
st.title("TL Studio")
st.write("Transfer learning on images, point and click. The guided pages are being built.")
