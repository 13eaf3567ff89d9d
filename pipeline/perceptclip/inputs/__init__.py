"""The readers, one per input kind (tars, Parquet with images, tables of locations, folders of image
files), and the shard URLs an input names."""
