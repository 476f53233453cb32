"""gptforge.data_prep.tokenization"""
