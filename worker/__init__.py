"""The meshserve worker: a stateless process bound to one device, serving world memberships."""
