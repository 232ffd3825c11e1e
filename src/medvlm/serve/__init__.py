"""Serving: an OpenAI-compatible API (``api``), LLaVA's controller / worker protocol, a Gradio web UI and the chat CLI.

Research use only: every API response, page and banner carries :data:`medvlm.notice.NOTICE`.
"""
