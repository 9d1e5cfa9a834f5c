"""Training data: the dataset entry point (:mod:`.dataset`), the data forms it reads (:mod:`.formats`) and the data files
shipped with the package (``*.txt``, ``*.jsonl``; sources and licences in README.md here).

May import errors and extras; nothing else of paca_core.
"""
