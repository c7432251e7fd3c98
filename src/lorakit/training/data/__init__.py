"""Training data, one job a module: `records` (read and validate a file, hold out a split), `render`
(records to text with the chat template), `tokenize` (text to examples with masked labels) and `batching`
(pack examples into blocks, collate a batch into tensors)."""
