"""The ext_proc service: Envoy External Processing (envoy.service.ext_proc.v3) for inference requests.

It authenticates the caller by API key, resolves the target model, checks the request against the
tenant's limits and sets the trusted `x-igw-*` headers that routing and rate limiting rely on.
"""
