"""The embedded offline demo: a tiny Llama config, a small tokenizer and synthetic chat tasks, all
shipped in the package, so `chatsft demo` trains and scores a model with no network and no GPU.

The entry point is `chatsft.demo.run.run_demo`; this package imports nothing itself, so that
`python -m chatsft.demo.run` and `python -m chatsft.demo.build_assets` load their module once.
"""
