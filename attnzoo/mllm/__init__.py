"""attnzoo.mllm"""
