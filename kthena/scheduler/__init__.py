"""
Pod choice: the framework (filters, weighted scores, decision records) in L{framework},
the plugins in L{plugins}, built from the Kthena-format C{scheduler} config section by
L{kthena.config.scheduler}. The data plane only sees L{kthena.interfaces.IScheduler}.
"""
