"""A run from a request: jobs (teacher, distill), what a run records and a resume may change,
teacher resolution, the quickstart.
"""
