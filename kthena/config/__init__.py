"""Router configuration: the router file and the resource documents it names."""
