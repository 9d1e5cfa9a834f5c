"""Finding a model's modules and replacing them (:mod:`.targets`: target patterns, decoder blocks, module widths) and
where adapter tensors are placed beside the weights they adapt (:mod:`.placement`: devices, accelerate offload).

May import errors and base_config only: layers, memory and distributed all build on it.
"""
