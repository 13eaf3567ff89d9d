"""The destination: every path under an output, the commit protocol (table, then marker), run records,
and what an output was made from (``output.destination``), checked before anything is written."""
