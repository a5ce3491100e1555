"""
Lean HTTP/1.1 on Twisted transports, parsing with C{httptools} (llhttp, in C) instead of
twisted.web's line parsers, which cost about a third of the router's CPU. The proxy
listener's server is L{kthena.http.server} (its requests are L{kthena.http.exchange}'s).
"""
