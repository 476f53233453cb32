"""gptforge.interop"""
