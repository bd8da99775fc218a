"""The wire, defined once: OpenAI shapes, the job envelope and its events, subjects, errors.

Pure data and codecs (stdlib, pydantic, msgpack). Every service imports from here; none
redefines a subject, a field or an error.
"""
