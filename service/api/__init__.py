"""HTTP layer: thin routes, request/response codecs, the error table, response schemas."""
