"""Our runtime around Flower (the same layer as flwr itself): it runs apps by module name and imports none of them.

``flower-simulation`` (flower_simulation), ``ppflower-supernode`` (supernode, superexec), ``ppflower deploy-local``
(deploy_local), every patch of Flower internals (flower_patches), signal handling (signals) and run locks (runlock).
"""
