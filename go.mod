module github.com/qcrypt/qcrypt

go 1.26.8

require gopkg.in/ini.v1 v1.68.0

require github.com/stretchr/testify v1.12.1 // indirect
