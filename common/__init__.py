"""gptforge.common"""
