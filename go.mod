module github.com/qcrypt/qcrypt

go 1.26.8
