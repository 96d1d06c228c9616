"""Bundled prompt sets (JSON lines); load them with cnt_lens.load_prompts."""
