"""Configuration: the one reader of the config file and the environment."""
