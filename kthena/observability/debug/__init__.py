"""
The debug endpoints, C{/debug/*} on the admin listener: read-only JSON views of what the
router holds (its resources as Kthena writes them, the routing table, recent routing
decisions, pods, model servers, prefill/decode groups, InferencePools, listeners and
connection pools).

C{/debug/config_dump/*} keeps Kthena's shapes and camelCase keys, so Kthena's tooling
reads them; the router's own views (C{router/state}, C{routing/*}, C{model-servers})
use snake_case, like the access log.

One module per job: L{access} (who may ask), L{common} (the sources and shared shapes),
one per view family (L{config_dump}, L{routing}, L{servers}, L{pd}, L{inference}) and
L{app} (the Klein app and
the gate in front of it). Only GET and HEAD are answered (else 405); clients the access
rules do not let in get 403 before any route is looked at. Secrets are never shown
(L{kthena.redact}).
"""
