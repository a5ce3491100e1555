from twisted.application.service import ServiceMaker

kthena_router = ServiceMaker("kthena-router", "kthena.tap", "AI-inference router.", "kthena-router")
