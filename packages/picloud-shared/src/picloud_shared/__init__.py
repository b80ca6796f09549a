"""picloud_shared."""
