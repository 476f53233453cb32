"""gptforge.data_prep"""
