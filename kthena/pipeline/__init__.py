"""
The data plane: one request's way through named stages, each a small module with one
job, in this order: parse, identify, route, admit, schedule, dispatch (with the relay),
settle. L{kthena.pipeline.pipeline} runs them and guarantees one settle per request.
"""
