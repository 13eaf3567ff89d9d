"""What a curator runs over committed scores: the keep-expression language, filter, quantiles, report."""
