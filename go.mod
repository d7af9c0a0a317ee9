module github.com/qcrypt/qcrypt

go 1.26.8

require gopkg.in/ini.v1 v1.68.0

require (
	github.com/sirupsen/logrus v1.10.2 // indirect
	github.com/stretchr/testify v1.12.1 // indirect
	golang.org/x/sys v0.13.0 // indirect
)
