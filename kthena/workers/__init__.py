"""
C{--workers N}: N router processes on one host behind the same listening socket, under a
parent that binds it, starts them, restarts the ones that die, passes signals on and
serves one admin site over all of them (see L{kthena.workers.supervisor}).
"""
