"""kthena-sim: a simulated vLLM / SGLang model server for demos, tests and benchmarks."""
