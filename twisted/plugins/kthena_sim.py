from twisted.application.service import ServiceMaker

kthena_sim = ServiceMaker(
    "kthena-sim", "kthena.sim.tap", "Simulated vLLM/SGLang server.", "kthena-sim"
)
