"""The prefill worker: computes prompts and pushes their KV into decode workers' blocks."""
