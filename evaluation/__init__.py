"""gptforge.evaluation"""
