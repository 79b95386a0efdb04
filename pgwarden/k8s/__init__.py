"""What the proxy and the operator share about Kubernetes: the names of pgwarden's API objects,
annotations and labels (`names`), and one small REST client (`client`)."""
