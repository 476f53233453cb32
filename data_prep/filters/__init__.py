"""gptforge.data_prep.filters"""
