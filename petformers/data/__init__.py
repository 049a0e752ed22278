"""Datasets: instruction data and raw text -> tokenized training rows.

formats (reading files, Alpaca -> conversation) -> templates (prompt / answer pieces) ->
prepare (tokenize, truncate) -> packing (rows) -> dataset (.npy + meta.json, read back mmapped).
mindrecord reads MindFormers' MindRecord files into the same row format.
"""
