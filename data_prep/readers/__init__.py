"""gptforge.data_prep.readers"""
