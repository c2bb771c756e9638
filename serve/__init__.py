"""The Shapley estimation service over the registry of trained surrogates (``layershap.surrogate.registry``): the HTTP API
(``app``, ``layershap serve``) and its Python client (``client``, also ``from layershap import Client``).

Example:
    $ layershap serve --port 8000
    >>> from layershap import Client
    >>> Client("http://127.0.0.1:8000").scores("gemma-3-270m").ranking()
"""
