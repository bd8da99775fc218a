"""The OpenAI-compatible HTTP facade: requests in, jobs out, events back as OpenAI responses."""
