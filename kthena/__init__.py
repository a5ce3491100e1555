"""kthena-router: an AI-inference router on Twisted, and its simulated model server."""
