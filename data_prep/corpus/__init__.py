"""gptforge.data_prep.corpus"""
