"""The results database: schema, engines, the single writer, and queries returning frames."""
