"""The data stage: records in, masked and truncated examples out.

* [`templates`][loraforge.data.templates]: prompt templates and their registry;
* [`records`][loraforge.data.records]: reading and validating records (alpaca, messages,
  ShareGPT);
* [`tokenize`][loraforge.data.tokenize]: segment tokenization with train/inference parity;
* [`builder`][loraforge.data.builder]: `SFTDatasetBuilder` and its `DataReport`.
"""
