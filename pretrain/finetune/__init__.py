"""Transfer: fine-tuning a pre-trained backbone on labelled data, prediction, linear probes, transfer
reports."""
