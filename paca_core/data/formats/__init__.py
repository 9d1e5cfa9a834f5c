"""The data forms ``paca train`` reads, each module with one job (``paca_core.data.dataset`` is the entry point).
May import errors and extras only.


* :mod:`.base` — :class:`DataError` and the label that means "no loss";
* :mod:`.fields` — which column holds what (``--text-field``, ``--field-map``);
* :mod:`.records` — records from ``.jsonl`` files and from datasets on disk (``save_to_disk`` folders,
  ``.parquet``, ``.arrow``, ``.csv``), checked row by row before any model loads;
* :mod:`.chat` — conversations rendered with the tokenizer's chat template, loss on the assistant turns only;
* :mod:`.packing` — several short examples per fixed-length row, kept apart by per-example position ids.
"""
