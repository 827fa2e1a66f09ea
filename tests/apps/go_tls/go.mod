module apitoolkit.test/go_tls

go 1.19
