"""The data-prep stage: raw preference JSON -> tokenized Arrow shards (`python -m data_prep --help`)."""
