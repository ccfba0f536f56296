"""Batch serving in the OpenAI Batch API's shape (files, batches), as durable jobs behind interactive traffic."""
