package dbusapi

import (
	_ "embed"
	"sort"
	"strings"
)

// Hand-written interface descriptions with argument names and docs; a test checks them
// against the exported Go methods and properties.
var (
	//go:embed xml/org.qcrypt.Qcryptd1.Manager.xml
	ManagerXML string
	//go:embed xml/org.qcrypt.Qcryptd1.Chain.xml
	ChainXML string
	//go:embed xml/org.qcrypt.Qcryptd1.Job.xml
	JobXML string
)

const (
	introspectHeader = `<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
`
	standardXML = `  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg name="xml_data" type="s" direction="out"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId"><arg name="machine_uuid" type="s" direction="out"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get"><arg name="interface_name" type="s" direction="in"/><arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="out"/></method>
    <method name="GetAll"><arg name="interface_name" type="s" direction="in"/><arg name="props" type="a{sv}" direction="out"/></method>
    <method name="Set"><arg name="interface_name" type="s" direction="in"/><arg name="property_name" type="s" direction="in"/><arg name="value" type="v" direction="in"/></method>
    <signal name="PropertiesChanged"><arg name="interface_name" type="s"/><arg name="changed_properties" type="a{sv}"/><arg name="invalidated_properties" type="as"/></signal>
  </interface>
`
	objectManagerXML = `  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects"><arg name="objects" type="a{oa{sa{sv}}}" direction="out"/></method>
    <signal name="InterfacesAdded"><arg name="object" type="o"/><arg name="interfaces" type="a{sa{sv}}"/></signal>
    <signal name="InterfacesRemoved"><arg name="object" type="o"/><arg name="interfaces" type="as"/></signal>
  </interface>
`
)

// nodeXML is the introspection document of one object.
func nodeXML(ifaces []string, children []string) string {
	var b strings.Builder
	b.WriteString(introspectHeader)
	for _, i := range ifaces {
		b.WriteString(i)
	}
	b.WriteString(standardXML)
	sort.Strings(children)
	for _, c := range children {
		b.WriteString(`  <node name="` + c + `"/>` + "\n")
	}
	b.WriteString("</node>\n")
	return b.String()
}

// directoryXML is the introspection of a directory of objects (the chains, the jobs):
// nothing but its children.
func directoryXML(children []string) string {
	var b strings.Builder
	b.WriteString(introspectHeader)
	b.WriteString(`  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg name="xml_data" type="s" direction="out"/></method>
  </interface>
`)
	sort.Strings(children)
	for _, c := range children {
		b.WriteString(`  <node name="` + c + `"/>` + "\n")
	}
	b.WriteString("</node>\n")
	return b.String()
}
