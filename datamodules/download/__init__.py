"""Getting data sets onto disk: an HTTP client that resumes and retries, the manifest downloader."""
